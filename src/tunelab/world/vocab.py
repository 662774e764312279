"""The word lists TinyWorld is drawn from.

Lists are disjoint where the model could confuse them: no first or last name is a city, colour,
job or pet word; employer names contain no colour; the new-fact vocabularies (instruments,
hobbies) never occur anywhere in the pretraining corpus, so facts built from them are new.
"""

from __future__ import annotations

FIRST_NAMES = """
Aaron Abel Ada Adele Agnes Aiko Alba Alma Amir Anika Anton Arjun Astrid Aurelio Axel Beatriz
Benedikt Bianca Boris Bruno Caio Camila Carmen Cedric Celia Chiara Clara Conrad Cyrus Dalia Damian
Daria Darius Delia Dmitri Dora Edgar Edith Elif Elio Elsa Emeka Enzo Esme Esteban Eva Fabio Farah
Felix Fiona Flavia Freya Gael Gemma Gideon Greta Gustav Hana Hector Helga Hiro Hugo Ilsa Imani Ines
Ingrid Isaac Ivan Jalen Jonas Josefa Jovan Julia Kai Kamal Karin Kenji Kira Klaus Lars Leila Leon
Lidia Lorenzo Luca Lucia Magnus Maia Malik Marek Marta Mateo Mila Mina Miro Nadia Nala Nico Nina Noor
Odile Olga Omar Oskar Otto Paloma Pavel Petra Pia Quentin Quinn Rafael Rania Raul Renata Rhea Rolf
Rosalind Rui Saanvi Samir Selma Sergei Silas Sofia Soren Stellan Tamar Tariq Thea Tobias Uma Ursula
Valentin Vera Viggo Wanda Wendell Xavier Ximena Yara Yusuf Yvette Zara Zeno Zofia Anouk Basil Cosima
Dario Elena Fenna Gunnar Halima Idris Jasper Kofi Linnea Milo Nestor Ottilie Priya Ramon Sunniva
Teodor Ulla Vikram Wilma
Adrian Aisha Alaric Alessia Amara Anselm Ariadne Arvid Aurora Bastian Bettina Bjorn Calla Casimir
Cato Cecilia Dagny Dante Desmond Dimitra Eamon Edwin Elias Elodie Emil Ernesto Estelle Eugen Fatima
Ferdinand Filippa Gabriel Gaspard Gisela Greer Hamid Hannes Harriet Henrik Ida Ignacio Ilya Irene
Isolde Jamal Jorge Juno Kaspar Katja Keiko Kwame Leander Liesel Lionel Lotte Lucian Mabel Marcel
Margit Matilda Maximilian Mirela Nadim Naomi Nils Noemi Octavia Orla Osman Pablo Philippa Rasmus Reza
Rocco Rowena Rufus Sabine Sancho Seraphina Sigrid Simone Stanislav Svea Tadeo Tilda Ugo Umberto Vesna
Wilhelm Yannick Yuki Zoltan Zuri
Abigail Alfonso Ambrose Anatole Annika Arlo Augustin Beatrix Benno Birgit Bodhi Brigid Carina
Cassius Clemens Cordelia Corin Dafne Dominik Dorothea Elsie Emeric Evander Fabian Florian Frida
Gregor Hedda Hilde Horatio Ismael Jolene Jurgen Kalani Konrad Larisa Leopold Lorna Ludmila Magda
Marius Melina Mireille Nadir Nerys Norbert Odette Orsolya Pascal Perpetua Radomir Rainer Regina
Roland Sabrina Severin Sienna Taddeo Theron Tomasz Ulrike Valeska Vivian Waltraud Yasmin Zelda
Zoraida Agathe Bertrand Constance Dorian Eberhard Folke Gwendolyn Hartwig Ingo Jovana Kasimira
Laszlo Mathis Nikolai Oona
""".split()

LAST_NAMES = """
Abara Achterberg Adler Alvarez Amato Andersen Arslan Asante Bakshi Balogun Barros Becker Bergstrom
Bianchi Blom Bodnar Brandt Caruso Castillo Chen Costa Dahl Dalton Delgado Demir Dietrich Dubois
Duarte Eklund Engel Esposito Falk Farouk Ferrante Fischer Fonseca Forde Gallo Garza Gomez Greco
Grund Haas Hadid Halvorsen Hartmann Herrera Holm Horvat Ibarra Ishikawa Ivanova Jansen Jensen
Jovanovic Kader Kaminski Kato Keller Kovac Kruger Kumar Lange Larsen Laurent Lehmann Lindqvist
Lombardi Lopez Lund Maier Marino Marquez Mbeki Medina Mendez Moreau Moretti Nakamura Navarro Nielsen
Novak Nunez Obi Okafor Olsen Ortega Ozturk Pardo Patel Pereira Petrov Pinto Quiroga Rahman Ramos
Reyes Richter Rios Rossi Sato Schmid Serrano Silva Sokol Soto Strand Suzuki Tanaka Torres Toth Ueda
Underhill Valdez Vargas Vidal Vogel Voss Wagner Weber Wolff Yamada Yilmaz Zamora Zeller Ziegler
Zubiri Abe Brennan Cardoso Drago Eriksen Ferreira Gruber Hoffman Iqbal Jaramillo Kowalczyk Lozano
Mahler Nagy Oyelaran Palmieri Rinaldi Sandoval Takahashi Urbano Vance Yoshida Zhang Kimura Ahmadi
""".split()

COUNTRY_CITIES: dict[str, tuple[str, ...]] = {
    "Spain": ("Madrid", "Seville", "Valencia", "Bilbao"),
    "France": ("Lyon", "Marseille", "Toulouse", "Nantes"),
    "Italy": ("Milan", "Naples", "Turin", "Bologna"),
    "Germany": ("Hamburg", "Munich", "Cologne", "Leipzig"),
    "Portugal": ("Lisbon", "Porto", "Braga", "Coimbra"),
    "Japan": ("Osaka", "Kyoto", "Nagoya", "Sapporo"),
    "Brazil": ("Recife", "Curitiba", "Salvador", "Manaus"),
    "Canada": ("Toronto", "Calgary", "Halifax", "Winnipeg"),
    "Egypt": ("Cairo", "Luxor", "Giza", "Aswan"),
    "India": ("Mumbai", "Pune", "Jaipur", "Chennai"),
    "Australia": ("Perth", "Adelaide", "Brisbane", "Hobart"),
    "Mexico": ("Puebla", "Oaxaca", "Monterrey", "Tijuana"),
}

JOBS = """
baker teacher nurse pilot farmer plumber lawyer dentist chef architect engineer librarian painter
butcher pharmacist journalist electrician firefighter gardener tailor mechanic photographer carpenter
surgeon florist accountant veterinarian sailor potter translator
""".split()

PETS = """
cat dog parrot rabbit hamster turtle goldfish canary ferret iguana lizard snake horse goat pony
""".split()

COLOURS = "red blue green yellow purple orange pink brown black white grey teal".split()

EMPLOYERS = [
    "Brightwell Foods", "Northwind Logistics", "Copperleaf Bank", "Stonebridge Media",
    "Meadowlark Textiles", "Pinecrest Software", "Harborview Shipping", "Oakridge Pharma",
    "Starling Airlines", "Lanternfield Energy", "Foxglove Publishing", "Ironwood Builders",
    "Kestrel Motors", "Willowmere Hotels", "Quillstone Press", "Ashford Insurance", "Thornbury Mills",
    "Cloudberry Dairies", "Riverton Clinics", "Highgate Robotics", "Marbleway Tiles", "Juniper Telecom",
    "Falconridge Mining", "Seabright Ferries", "Hollowell Furniture", "Emberlake Glassworks",
    "Windmere Farms", "Larkspur Toys", "Granite Peak Outfitters", "Wrenfield Chemicals",
]

AGE_RANGE = (20, 79)

# New facts: vocabularies that never occur in the pretraining corpus.
INSTRUMENTS = "violin cello trumpet flute harp clarinet banjo accordion oboe ukulele saxophone tuba".split()
HOBBIES = """
knitting chess archery juggling kayaking birdwatching origami fencing skateboarding calligraphy
beekeeping stargazing
""".split()

# Skills and meta-learning.
NUMBER_WORDS = "zero one two three four five six seven eight nine".split()
NONCE_WORDS = "zib mok tav rul pim dax wug fep lor nis".split()
LIST_WORDS = """
apple river stone cloud lamp bread table mirror garden candle window rocket pencil ladder
basket button kettle feather ribbon wagon
""".split()

# Sentiment: opinions about places and things of the world.
POSITIVE = "wonderful lovely great excellent delightful pleasant superb charming".split()
NEGATIVE = "awful terrible dreadful boring disappointing horrible dull miserable".split()
POSITIVE_VERBS = "loved enjoyed adored admired".split()
NEGATIVE_VERBS = "hated disliked regretted loathed".split()
OPINION_THINGS = """
bakery museum market harbour park theatre library station hotel cafe garden concert bridge festival
""".split()
